"""The command line: the one place that wires the data plane (gateway) and the admin plane
(admin) together, so that neither package imports the other the wrong way round."""
