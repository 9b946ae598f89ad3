"""The benchmark suite: speed and memory of iv2_lightning against its peers and the machine's limits.

``python benchmarks/run.py --quick|--full`` is the entry point (see its docstring for what each
section measures); one module per section (:mod:`.peers` holds the peer, MFU and masking rows,
:mod:`.profiling`, :mod:`.divjoint`, :mod:`.hte`, :mod:`.data_vs_model`, :mod:`.gpu`), the
shared parts in :mod:`.config` (settings, figure names), :mod:`.measure` (timing, FLOP counting),
:mod:`.workloads` (the models and steps timed), :mod:`.memory` (fresh-process peak memory), and the
output in :mod:`.report` / :mod:`.report_sections` (``docs/benchmarks.md``) and :mod:`.tables`
(the console). ``benchmarks/data_throughput.py`` (clip decoding) stands alone.
"""
