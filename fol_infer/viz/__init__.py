"""Figures: what FoL sees (regions), what it matched (token pairs), what came back (results),
and the benchmark charts.

Each figure is two steps: a function that computes the data it plots (plain numpy, tested)
and a drawing function. matplotlib is imported here only, inside `figure.py`, and only when a
figure is drawn; it is the ``viz`` extra (``pip install 'fol-infer[viz]'``).
"""
