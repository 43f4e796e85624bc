"""``python -m k15_plugin.verl --config-dir`` prints the directory of the plugin's verl configs (for verl's
``--config-dir``); ``--list`` prints their names."""

import argparse

from k15_plugin.verl import CONFIG_DIR, CONFIG_NAMES


def main(argv=None) -> int:
    """Print the config directory (``--config-dir``) or the config names, one a line (``--list``); returns 0."""
    parser = argparse.ArgumentParser(prog="python -m k15_plugin.verl", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config-dir", action="store_true", help="print the config directory")
    group.add_argument("--list", action="store_true", help="print the config names (verl's --config-name)")
    args = parser.parse_args(argv)
    print(CONFIG_DIR if args.config_dir else "\n".join(CONFIG_NAMES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
