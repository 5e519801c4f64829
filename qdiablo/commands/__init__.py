"""One module per `qdiablo` verb: each defines HELP, add_arguments(parser) and run(args)."""
