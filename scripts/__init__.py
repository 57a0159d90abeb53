"""Command-line tools of the project: ``python -m scripts.<name>`` or the ``support-classifier-*`` commands."""
