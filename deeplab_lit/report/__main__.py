"""python -m deeplab_lit.report"""
from deeplab_lit.cli import run
from deeplab_lit.report.cli import main

if __name__ == "__main__":
    run(main)
