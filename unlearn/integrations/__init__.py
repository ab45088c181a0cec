"""Recording from training frameworks' own loops: ``huggingface`` and ``lightning`` (each a ``RecordingCallback``).

Each integration imports its framework only when its module is imported.
"""
