from archpass.cli.main import main

main()
