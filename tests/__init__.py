"""The tests, by purpose: unit/ (in-process), integration/ (real worker processes,
sockets, shared memory), system/ (the installed command as a user runs it);
helpers/ (what they share: engines, receivers, a private RabbitMQ, certificates,
the vectors loader)."""
