"""Code shared by the ServerApp and the ClientApp: config, message contract, model, data."""
