"""Figure style and drawing helpers shared by the run plots, the report and the analyses."""
