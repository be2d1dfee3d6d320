"""Reports: loading records, statistics, Markdown tables, plots."""
