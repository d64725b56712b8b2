from components.distill.train import main

main()
