"""What a pretrained network is, and how much of it trains."""
