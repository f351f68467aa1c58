"""Data: files -> canonical rows (``rows``), images and how many a row may carry (``images``)."""
