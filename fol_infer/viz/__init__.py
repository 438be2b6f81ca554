"""Figures: what FoL sees (regions), what it matched (token pairs), what came back (results),
and the benchmark charts.

Each figure is two steps: a function that computes the data it plots (plain numpy, tested)
and a drawing function. matplotlib is imported in this package only, inside the drawing
functions, after `figure.new_figure` has checked it is there; it is the ``viz`` extra
(``pip install 'fol-infer[viz]'``).
"""
