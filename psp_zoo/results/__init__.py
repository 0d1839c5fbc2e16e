"""Results as files and text: ``records.py`` (``ResultRecord`` and the results-file format), ``tables.py``
(the published tables rebuilt from records), ``reports.py`` (text for people), ``published_logs.py`` (the
published training logs against the table). This file imports nothing.
"""
