"""What the tests and the bench start for real, outside the engine's own code:
broker.py (LocalBroker, a private RabbitMQ node on loopback). Nothing in the
engine's core, its sources, the MI or the command line imports this package."""
