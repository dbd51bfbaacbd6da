"""Time every backend on this machine and write the automatic choice's table: the script form of `selfattn tune`.

    python benchmarks/tune.py [--device cuda] [--out PATH] [--sizes 128,512,2048] [--quick] [--all]
    python benchmarks/tune.py --ship     # into src/selfattn/backends/tables/, the tables shipped with the package
"""

import sys

from selfattn import cli
from selfattn.backends import choice

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--ship" in argv:
        argv.remove("--ship")
        from selfattn import tune

        device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
        name = tune.table_filename({"device": choice.device_name(device), "torch": choice.torch_version()})
        argv += ["--out", str(choice.SHIPPED_DIR / name)]
    sys.exit(cli.main(["tune", *argv]))
