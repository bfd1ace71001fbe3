from lora_tools.cli import main

main()
