"""Training frameworks: evaluators and callbacks for PyTorch Lightning and Hugging Face Transformers.

Each integration lives in its own module and imports its framework only when used, so quantrain itself needs
neither (install the ``lightning`` or ``transformers`` extra).
"""
