"""Running the app as a real deployment: certificates, keys and a local SuperLink + SuperNodes.

``python -m deploy.certificates`` writes a CA, the SuperLink's TLS certificate and SuperNode
authentication keys; ``python -m deploy.local`` starts a SuperLink with TLS and SuperNode
authentication, registers the SuperNodes' keys, starts them and runs the app
(docs/deployment.md).
"""
