/*
 * tiny_worker: the worker the supervisor benchmark runs, under plumule and under the bench's
 * own fork+exec loop (the baseline).
 *
 * usage: tiny_worker LOGFILE [ID]
 *
 * First thing after exec it reads CLOCK_MONOTONIC, then appends one line "ID PID MONOTONIC_NS"
 * to LOGFILE with a single write(2) on an O_APPEND descriptor, so lines from hundreds of
 * workers never interleave. ID is argv[2], else $PLUMULE_WORKER_ID (supervisors that cannot set
 * an environment per worker pass it as an argument). Then it waits in pause() until a signal
 * ends it: every disposition is the default one, so SIGTERM and SIGKILL kill it at once.
 *
 * Exit status 2: bad usage; 1: the log line could not be written.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		return 1;

	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: tiny_worker LOGFILE [ID]\n");
		return 2;
	}
	const char *id = argc == 3 ? argv[2] : getenv("PLUMULE_WORKER_ID");
	if (id == NULL || *id == '\0') {
		fprintf(stderr, "tiny_worker: no ID argument and no PLUMULE_WORKER_ID\n");
		return 2;
	}

	char line[128];
	long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
	int len = snprintf(line, sizeof line, "%s %ld %lld\n", id, (long)getpid(), ns);
	if (len <= 0 || (size_t)len >= sizeof line) {
		fprintf(stderr, "tiny_worker: ID too long\n");
		return 2;
	}

	int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0) {
		perror("tiny_worker: open");
		return 1;
	}
	if (write(fd, line, (size_t)len) != len) {
		perror("tiny_worker: write");
		return 1;
	}
	close(fd);

	for (;;)
		pause();
}
