"""Model-card templates of hf-sad (Jinja markdown), shipped inside the package as `hf_sad.model_cards`."""
