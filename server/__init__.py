"""Server side: datasets and their arrival, models, training and partial-update strategies."""
