from diffcore.cli import main

main()
