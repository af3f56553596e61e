"""The command line: the base CLI (base), the arms runner (arms) and one module per subcommand."""
from .arms import arm_args, read_experiment, select_arms, with_arm
from .base import BASE_CONFIG, MoSCLI, pop_option
from .main import cli_main

__all__ = ["BASE_CONFIG", "MoSCLI", "arm_args", "cli_main", "pop_option", "read_experiment", "select_arms",
           "with_arm"]
