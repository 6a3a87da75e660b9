"""One module per `config.mode`; each exposes `run(config, workdir)`."""
