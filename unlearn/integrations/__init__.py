"""Recording from training frameworks' own loops: ``lightning`` (``RecordingCallback``).

Each integration imports its framework only when its module is imported.
"""
