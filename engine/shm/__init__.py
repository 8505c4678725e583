"""Shared memory, both sides: everything the main process and the workers share.

segment.py  named POSIX segments: create, attach, reclaim
ring.py     the single-producer/single-consumer ring: its layout, writer and reader
counters.py the per-worker counter block: its layout, journal and heartbeat
spec.py     the WorkerSpec the supervisor hands a worker
doorbell.py the eventfd an idle worker sleeps on, and the producer rings
mmsg.py     the sendmmsg/recvmmsg C structures both sides hand the kernel
No other module computes an offset into a ring or the counter block.
"""
