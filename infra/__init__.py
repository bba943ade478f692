"""Native local infrastructure: the real Kafka broker and S3 server, topic/bucket bootstrap, and
the local-stack runner behind `maas stack`. Nothing here is imported by services at runtime."""
