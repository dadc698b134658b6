"""What tests share, by subject: running the command line and reading its results (``runs``), corpora
(``corpora``), resumed runs (``resume``), processes (``processes``), host reads (``host_reads``)."""
