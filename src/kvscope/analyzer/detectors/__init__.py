"""Built-in detectors: every module here that defines ``DETECTOR`` is registered by being here."""
