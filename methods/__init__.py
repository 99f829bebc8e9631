"""Method implementations, one file per method (installed as ``alignbench.methods``)."""
