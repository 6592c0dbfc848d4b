"""32 fixed chat prompts for greedy-agreement measurements (benchmarks/bench_quantize.py).

Real questions of the kind a user types into a small instruct model: facts, arithmetic, short
writing, code, instructions. The first two are the shipped SmolLM2 recipes' demo prompts.
"""

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about compilers.",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "How many days are there in a leap year?",
    "What is 12 times 12?",
    "Explain photosynthesis in one sentence.",
    "What is the boiling point of water in Celsius?",
    "Name three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Give me a synonym for 'happy'.",
    "What is the chemical symbol for gold?",
    "Write a Python function that returns the square of a number.",
    "What is the tallest mountain in the world?",
    "Why is the sky blue?",
    "List the days of the week.",
    "What is the capital of Japan?",
    "Summarize the plot of Cinderella in two sentences.",
    "How do I make a cup of tea?",
    "What is the speed of light?",
    "Who painted the Mona Lisa?",
    "What is an atom?",
    "Give three tips for staying healthy.",
    "What is the square root of 81?",
    "Write a short poem about the ocean.",
    "What language is spoken in Brazil?",
    "What is machine learning?",
    "How many continents are there?",
    "What is the freezing point of water in Fahrenheit?",
    "Suggest a name for a pet cat.",
    "What is the difference between weather and climate?",
]
