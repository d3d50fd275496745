# segflow: the API, the delivery worker and the migrations runner in one image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
# Editable install: the SQL files and alembic migrations live beside the packages in the
# source tree (sql/, migrations/), not inside them.
RUN pip install -e . \
    && useradd --system --no-create-home --home-dir /app segflow

USER segflow
EXPOSE 8000
CMD ["segflow", "api", "--host", "0.0.0.0", "--port", "8000"]
