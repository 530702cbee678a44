"""The command line shared by the cluster launchers: their own flags, then
`--`, then the capjax command every host runs."""

import argparse
import sys
from typing import Callable


def parse(prog: str, doc: str, add_flags: Callable[[argparse.ArgumentParser], None],
          example: str, argv=None) -> argparse.Namespace:
  """The launcher's flags, with the capjax command as `command`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser(prog=prog, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Everything after -- is the capjax command (train, eval).")
  add_flags(p)
  p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
  args = p.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if not args.command or args.command[0] not in ("train", "eval"):
    p.error(f"give the capjax command after --, e.g. -- {example}")
  args.error = p.error
  return args
