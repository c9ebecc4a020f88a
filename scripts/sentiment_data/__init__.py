"""The pieces of `scripts/build_sentiment_data.py`, which builds the shipped sentiment data (`data/sentiment/`)."""
