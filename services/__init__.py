"""thalex-tp: a portfolio-wide, fee-aware take-profit guardian for Thalex."""
