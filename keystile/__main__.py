from keystile.cli import main

main()
