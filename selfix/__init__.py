"""selfix: a crash-safe ComfyUI GPU worker fed by Kafka, with LoRAs and images on S3."""

__version__ = "0.1.0"
