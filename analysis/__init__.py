"""Analysis: results tables and paper-style figures (installed as ``alignbench.analysis``)."""
