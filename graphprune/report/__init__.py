"""Tables, JSON, plots and HTML reports."""
