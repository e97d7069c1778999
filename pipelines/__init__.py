"""The Ray shell: thin drivers wiring ``ldmseg`` into Ray Data, Train, Tune, Serve and MLflow."""
