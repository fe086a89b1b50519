"""Model -> activations: load a stock model, name its sites, hook them, capture what they carry."""
