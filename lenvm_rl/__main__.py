from lenvm_rl.cli import main

main()
