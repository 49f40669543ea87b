"""`python -m deeplab_lit.crf.search`: the former name of `python -m deeplab_lit.crf_search`.

The search is a command, and crf/ is the algorithm only, so this module imports nothing: run as a
program it hands over to the command by name.
"""
if __name__ == "__main__":
    import runpy

    runpy.run_module("deeplab_lit.crf_search", run_name="__main__", alter_sys=True)
