"""A tool-loop pipeline for the crash test: Gemini at a loopback fake, tools log to a file.

Usage: gemini_crash_app.py DATABASE_URL BASE_URL LOG_FILE (start|recover)
"""

from __future__ import annotations

import sys

from google import genai
from google.genai import types

from durapipe import Agent, App
from durapipe.models import GeminiModel

database_url, base_url, log_file, mode = sys.argv[1:5]


def record(line: str) -> None:
    with open(log_file, "a") as f:
        f.write(line + "\n")


def weather(city: str) -> dict[str, object]:
    """Current weather in a city."""
    record(f"weather {city}")
    return {"city": city, "celsius": 20.0}


async def to_fahrenheit(celsius: float) -> float:
    """Convert Celsius to Fahrenheit."""
    record(f"to_fahrenheit {celsius}")
    return celsius * 9 / 5 + 32


client = genai.Client(api_key="test", http_options=types.HttpOptions(base_url=base_url))
model = GeminiModel("gemini-2.5-flash", client, initial_delay=0.01)
app = App("crash-app", database_url)
pipeline = app.pipeline("weather", Agent("assistant", model).instruct("Weather in {city}, in F?")
                        .tools(weather, to_fahrenheit).writes("answer"))

if __name__ == "__main__":
    with app:  # recovery of the unfinished run happens here
        if mode == "start":
            handle = pipeline.start({"city": "Oslo"}, run_id="crash-run")
        else:
            handle = app.get_run("crash-run")
        print("ANSWER", handle.result(timeout=60).state["answer"], flush=True)
