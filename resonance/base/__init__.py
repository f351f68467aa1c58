"""Base classes that every generated adapter specialises."""
