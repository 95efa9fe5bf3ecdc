"""`python -m spark_mcore.twin --model HF_DIR --port 0`: run the CPU twin of an SGLang server."""

from spark_mcore.twin.server import main

if __name__ == "__main__":
    main()
