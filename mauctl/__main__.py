from mauctl.cli import main

main()
