"""`python -m workers`: run one worker; its WorkerSpec arrives pickled on stdin."""

import pickle
import sys

from workers.worker import main

main(pickle.load(sys.stdin.buffer))
