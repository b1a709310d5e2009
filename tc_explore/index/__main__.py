"""``python -m tc_explore.index build|merge|info|push|pull ...``: the ``tc-explore
index`` commands, the module torchrun launches::

    torchrun --nproc-per-node 8 -m tc_explore.index build --model gpt2 ...
"""
import sys

from ..cli import main

sys.exit(main(["index", *sys.argv[1:]]))
