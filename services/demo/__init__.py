"""`thalex-tp demo`: the whole guardian, a paper exchange and a quoter, on one machine."""
