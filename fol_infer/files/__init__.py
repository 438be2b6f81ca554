"""Keeping files safe: atomic writes and folder swaps (`atomic`), integrity checks at open
(`integrity`), what a command may replace or write (`ownership`), the user cache
(`user_cache`), and file names that are not UTF-8 (`names`). Below every product module: it
knows the products only through the markers they declare."""
